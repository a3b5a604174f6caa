"""The miniature world: generator, object F1 and the tiny pretrained models that prove the pipeline offline."""
