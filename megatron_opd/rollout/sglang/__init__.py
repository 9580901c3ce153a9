"""SGLang rollouts: servers launched or attached, the HTTP client, weight sync."""
