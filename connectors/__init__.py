"""One module per external system (Kafka, Redis, vLLM); no policy decisions here."""
