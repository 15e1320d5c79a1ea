"""The data and the pure numpy stages: ``MaskSet``, selection, box matching, morphology, geometry, the codec."""
