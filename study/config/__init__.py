"""The config: the YAML file loaded into typed, validated settings, the study-name rule and which user modules may be
imported."""
