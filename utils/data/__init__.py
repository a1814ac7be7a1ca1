"""The data wing: dataset folder layouts and specs, preparing and checking them, the demo data,
``datasets.py``'s command line."""
