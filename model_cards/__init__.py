"""Model-card templates, shipped as package data (`importlib.resources.files("efficientvlm.model_cards")`)."""
