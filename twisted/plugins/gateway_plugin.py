from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "txgateway",
    "gateway.service",
    "Device-to-cloud gateway: ingest readings over HTTPS into PostgreSQL.",
    "gateway",
)
