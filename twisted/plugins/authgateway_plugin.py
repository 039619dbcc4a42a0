from twisted.application.service import ServiceMaker

authgateway = ServiceMaker(
    "authgateway",
    "gateway.tap",
    "Authentication gateway: ESMTP submission, HTTP and SOCKS5 on one cred Portal.",
    "authgateway",
)
