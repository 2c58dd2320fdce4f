"""
The HTTP layer the HTTPS API, the read API, the dashboard and HTTPS ingest
share: JSON answers, bearer tokens, the site with its body limit and
deadlines, and the operations resources (/healthz, /readyz, /livez, /metrics).
"""
