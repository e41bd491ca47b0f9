"""Reports over the runner's results tables: ``python -m flashlight.report RUN_OR_SWEEP_DIR ...``.

    build    - gather results tables, write the summary (markdown, HTML), figures and notebook; the CLI
    plots    - the figures, as plain functions of a results table (copied into the notebook)
    notebook - the notebook that redraws the figures from the report's table
"""
