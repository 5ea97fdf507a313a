"""InfluenceReport: the evidence report of a scorer's output as an artifact (one HTML page)."""
