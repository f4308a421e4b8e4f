"""The one item type every reader produces and every other module consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MCQItem:
    id: str
    question: str
    options: tuple[str, ...]  # in presentation order; options[answer] is correct
    answer: int  # 0-based index into options
    explanation: str | None = None
    subject: str | None = None
    benchmark: str = "generic"  # selects the harness prompt variant: medqa, medmcqa, pubmedqa, mmlu, generic

    @property
    def gold_letter(self) -> str:
        return LETTERS[self.answer]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = list(self.options)
        return d

    def permuted(self, order: list[int]) -> MCQItem:
        """The same question with options[order[i]] shown at position i; the answer index follows its option."""
        return MCQItem(
            id=self.id,
            question=self.question,
            options=tuple(self.options[j] for j in order),
            answer=order.index(self.answer),
            explanation=self.explanation,
            subject=self.subject,
            benchmark=self.benchmark,
        )
