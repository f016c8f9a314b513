"""Representation compression: the front door of the representation family (docs/representation.md).

Pure functions on a representation matrix Z (N tokens x D features; torch tensor or numpy array):

    _spectra    the eigenspectrum of the Gram/covariance and the metrics on it: matrix entropy,
                effective rank, alpha-ReQ; ``representation_metrics`` (all at once, one eigensolve)
    _twonn      TwoNN intrinsic dimension (Facco et al. 2017) with a verified nearest-neighbour search
    _infoplane  matrix-based Renyi entropies and mutual information of kernel Grams (information plane)
    _readout    the logit lens through the model's own head, and a fitted softmax probe
    _phases     when a layer turns from expansion to compression: a hinge change-point test
    _linalg     float64 input handling, the PSD eigenvalue routine and its numerical-zero rule

Import from here, not from the private modules::

    from diagnostics.representation import matrix_entropy, effective_rank, twonn_dimension
    from diagnostics.representation import detect_compression_onset, information_plane
"""

from diagnostics.representation._infoplane import (gram_entropy, information_plane, joint_gram_entropy, kernel_gram,
                                                   mutual_information, mutual_information_ty,
                                                   mutual_information_xt)
from diagnostics.representation._linalg import renyi_entropy
from diagnostics.representation._phases import (COMPRESSION_DIRECTION, detect_compression_onset, detect_phases,
                                                format_event, hinge_fit)
from diagnostics.representation._readout import ProbeResult, fit_linear_probe, readout_loss
from diagnostics.representation._spectra import (alpha_req, effective_rank, eigenspectrum,
                                                 grouped_representation_metrics, matrix_entropy,
                                                 representation_metrics)
from diagnostics.representation._twonn import twonn_dimension

__all__ = [
    "eigenspectrum", "renyi_entropy", "matrix_entropy", "effective_rank", "alpha_req", "twonn_dimension",
    "kernel_gram", "gram_entropy", "joint_gram_entropy", "mutual_information", "mutual_information_xt",
    "mutual_information_ty", "information_plane", "readout_loss", "ProbeResult", "fit_linear_probe",
    "representation_metrics", "grouped_representation_metrics",
    "COMPRESSION_DIRECTION", "detect_compression_onset", "detect_phases", "format_event", "hinge_fit",
]
