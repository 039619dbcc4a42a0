"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929)."""
