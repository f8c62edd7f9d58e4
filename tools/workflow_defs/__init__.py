"""One module per technique: each defines WORKFLOWS = {file stem: build(graph)}; tools/build_workflows.py writes them."""
