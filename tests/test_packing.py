"""Pure sequence maths: blocks, labels from spans, position ids, bin packing."""

from tuneyard.training.data.packing import IGNORE_INDEX, labels_from_spans, pack_into_blocks


def test_blocks_concatenate_documents_and_drop_the_tail():
    assert pack_into_blocks([[1, 2, 9], [3, 9], [4, 5, 6, 9]], 4) == [[1, 2, 9, 3], [9, 4, 5, 6]]
    assert pack_into_blocks([[1, 2]], 4) == []


def test_labels_keep_tokens_overlapping_spans():
    ids = [10, 11, 12, 13]
    offsets = [(0, 3), (3, 5), (5, 9), (9, 12)]
    # span 4..9 overlaps token 1 (3..5) and token 2 (5..9), not token 0 or 3
    assert labels_from_spans(ids, offsets, [(4, 9)]) == [IGNORE_INDEX, 11, 12, IGNORE_INDEX]
