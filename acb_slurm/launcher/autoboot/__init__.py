"""The directory `acb-run --auto` puts first on the program's PYTHONPATH (sitecustomize.py)."""
