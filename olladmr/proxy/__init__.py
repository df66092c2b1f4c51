"""The proxy path: exchanges, the upstream client, header hygiene and the response relay."""
