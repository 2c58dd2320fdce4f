"""txgateway: field readings into PostgreSQL without loss, and on to the cloud."""

__version__ = "0.1.0"
