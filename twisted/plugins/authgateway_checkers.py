# The gateway's --auth types: htpasswd:PATH and tokens:PATH.
from gateway.checkers.htpasswd import HtpasswdCheckerFactory
from gateway.checkers.tokens import TokenCheckerFactory

htpasswd = HtpasswdCheckerFactory()
tokens = TokenCheckerFactory()
