"""The Feast repo of broadfast (feature_store.yaml + broadfast_features.py); `feast -c <this folder> apply`."""
