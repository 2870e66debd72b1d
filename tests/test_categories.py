import pytest

from m2f_cli.model.categories import COCO_IDS, COCO_NAMES, CategoryTable


def test_table_is_coco_80():
    t = CategoryTable.coco()
    assert len(t) == 80 and len(set(COCO_IDS)) == 80 and len(set(COCO_NAMES)) == 80
    assert (t[0].id, t[0].name) == (1, "person")
    assert (t[11].id, t[11].name) == (13, "stop sign")  # never index + 1
    assert (t[79].id, t[79].name) == (90, "toothbrush")
    assert t.is_coco


def test_from_id2label_maps_coco_names_to_coco_ids():
    t = CategoryTable.from_id2label({0: "sports ball", 1: "kite", 2: "frisbee", 3: "clock"})
    assert [c.id for c in t.categories] == [37, 38, 34, 85]
    other = CategoryTable.from_id2label({0: "wall", 1: "building"})
    assert [c.id for c in other.categories] == [1, 2] and not other.is_coco


def test_resolve_by_name_and_id_and_unknown():
    t = CategoryTable.coco()
    assert t.resolve("Stop Sign").index == 11
    assert t.resolve("18").name == "dog"
    assert t.resolve("motorbike").name == "motorcycle"
    with pytest.raises(KeyError) as e:
        t.resolve("unicorn")
    assert "unicorn" in e.value.args[0] and "toothbrush" in e.value.args[0]


def test_colours_are_stable_and_distinct():
    """Colours are a pure function of the category id, pinned here: overlays of two runs, two
    versions or two machines colour a class alike."""
    t = CategoryTable.coco()
    assert [t.by_id(i).color for i in (1, 13, 18)] == [(60, 113, 242), (242, 98, 60), (242, 196, 60)]
    assert CategoryTable.from_id2label({0: "dog"}).by_id(18).color == (242, 196, 60)  # by id, not index
    assert len({c.color for c in t.categories}) > 70
