"""The homework's report questions, in its numbering (P3 is problem 2's visualisation part): the headings every
section answers under and the tests look for."""

QUESTIONS = dict(
    p1_methods="1. Methods analysis: why CLIP achieves competitive zero-shot performance",
    p1_prompts="2. Prompt-text analysis of the three templates",
    p1_top5="3. Quantitative analysis: top-5 similarity probabilities of three validation images",
    p2_best="1. Best setting and its CIDEr and CLIPScore on the validation data",
    p2_attempts="2. Three PEFT attempts and their CIDEr and CLIPScore",
    p3_test="1. Predicted captions and attention maps of the five test images",
    p3_best_worst="2. Top-1 and last-1 image-caption pairs by CLIPScore on the validation data",
    p3_analysis="3. Analysis: is the caption reasonable? Does the attended region reflect the word?",
)
