"""
The network plumbing every listener shares: endpoint strings, listening
ports held until the gateway can answer, connection limits, and TLS
(the data directory's own CA and server certificate, and the standard
library's TLS for clients).
"""
