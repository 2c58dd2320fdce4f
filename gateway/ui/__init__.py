"""The fleet dashboard at /ui/: a page of our own, the read API behind it, plotly.js for the charts."""
