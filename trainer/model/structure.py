"""What an objective may ask of the model's structure beyond extra heads: one typed declaration."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ModelStructure"]


@dataclass(frozen=True)
class ModelStructure:
    """The heads and structural options an objective needs; the model builder reads it.

    The default is the plain model: ctr and cvr heads, each tower reading its own MMoE mixture.

    Attributes:
        extra_heads: heads beyond ``("ctr", "cvr")`` (an objective's ``required_heads``).
        cvr_transfer: heads whose MMoE mixtures DDPO's causal transfer modules fuse with the CVR
            mixture into the CVR tower's input (ddpo.txt Eq. 12-14), e.g.
            ``("ctr", "conversion_propensity")``. Empty: the CVR tower reads its own mixture.
            This changes pCVR at inference, so the export carries the modules (and the sources'
            gates) and the service computes them.
        conditioned_heads: heads whose predictor reads their representation conditioned on the
            click propensity: the outer product of the tower's last hidden layer with a linear
            projection of the detached pCTR (EVI's teacher, evi.txt Figure 1). Training-only.
        propensity_dim: width of that projection.

    Raises:
        ValueError: a head used as a transfer source or conditioned that the model does not
            build, the cvr head as its own source, a conditioned core head, or a non-positive
            ``propensity_dim``.

    Example::

        ModelStructure(
            extra_heads=frozenset({"conversion_propensity"}),
            cvr_transfer=("ctr", "conversion_propensity"),
        )
    """

    extra_heads: frozenset[str] = field(default_factory=frozenset)
    cvr_transfer: tuple[str, ...] = ()
    conditioned_heads: frozenset[str] = field(default_factory=frozenset)
    propensity_dim: int = 5

    def __post_init__(self) -> None:
        heads = {"ctr", "cvr"} | set(self.extra_heads)
        if "cvr" in self.cvr_transfer or len(set(self.cvr_transfer)) != len(self.cvr_transfer):
            raise ValueError(
                f"cvr_transfer must name distinct heads other than 'cvr', got {self.cvr_transfer}"
            )
        unknown = sorted(set(self.cvr_transfer) - heads)
        if unknown:
            raise ValueError(
                f"cvr_transfer reads heads {unknown} that are not among the model's heads {sorted(heads)}"
            )
        wrong = sorted(set(self.conditioned_heads) - set(self.extra_heads))
        if wrong:
            raise ValueError(f"conditioned_heads must be extra heads (not ctr/cvr), got {wrong}")
        if self.propensity_dim < 1:
            raise ValueError(f"propensity_dim must be >= 1, got {self.propensity_dim}")
