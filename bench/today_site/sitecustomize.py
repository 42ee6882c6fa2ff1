"""Put first on a worker's PYTHONPATH by bench.viewer: that worker runs today's path (see bench.today)."""

from bench.today import install

install()
