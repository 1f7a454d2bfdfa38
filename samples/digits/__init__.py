"""The embedded 8x8-digits model: the fixed scikit-learn split (:mod:`.data`) and the classifier / evaluator networks
with the weights location (:mod:`.nets`). The trainer is ``scripts/train_digits.py``, outside the installed package."""
