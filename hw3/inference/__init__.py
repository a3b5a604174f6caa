"""Captioning a folder of images into the course's JSON."""
