"""A line-based device protocol for txgateway: the worked example of a transport plugin."""
