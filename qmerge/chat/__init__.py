"""Chat templates: the model's Jinja template translated to Ollama's Go template, checked by rendering."""
