"""Development tools shipped for the demo: fake model and tool servers."""
