"""The node's HTTP side: one aiohttp application, one module per API family."""
