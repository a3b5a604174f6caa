"""Published results our tables are set beside, each with the work that published it, cited by its public name."""
from __future__ import annotations

# Another course's image-captioning project on DeepFashion-MultiModal (written in Chinese; the title translated).
COURSE_PROJECT_REPORT = ("the course project report 'Neural Networks and Deep Learning Course Design: Final Report' "
                         "(Zhao, Wang and Zhang; image captioning on DeepFashion-MultiModal)")

# Its captioners (model, our --arch of the same kind, CIDEr), the table the compare stage is set beside.
DEEPFASHION_CAPTIONERS = (("ResNet-101 global + GRU", "gru", 1.235),
                          ("ResNet-101 grid + attention GRU", "attention-gru", 1.275),
                          ("ViT-B/16 + Transformer decoder", "transformer", 1.618))

# Its section 5.2: small captioners trained on a LoRA-tuned LLaVA-13B's captions of DeepFashion-MultiModal
# (section 4.2.3: "precise", and "creative" sampled at temperature 0.9), scored on the real references.
DISTILLED_STUDENTS = (("precise", dict(CIDEr=1.90, BLEU=0.653, METEOR=0.624, ROUGE=0.654)),
                      ("creative (sampled at 0.9)", dict(CIDEr=0.259, BLEU=0.339, METEOR=0.247, ROUGE=0.293)))
DISTILLED_STUDENTS_CITATION = ("%s, sections 4.2.3 and 5.2: students trained on LLaVA-13B captions of "
                               "DeepFashion-MultiModal; its BLEU column does not say which n" % COURSE_PROJECT_REPORT)
