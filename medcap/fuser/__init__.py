"""The fusion stage: one final caption per image from the candidates of several generators."""
