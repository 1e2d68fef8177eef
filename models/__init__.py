"""Flow models: example store, classifiers, model files and automatic learning.

Import the submodules directly (store, classifier, persist, autolearn); this package
imports nothing so that ``spamflow`` starts without loading scikit-learn.
"""
