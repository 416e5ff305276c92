"""python -m backend.evaluate: stored predictions against the annotations, per control and label."""
from backend.evaluate import compare_task, evaluate_tasks, markdown, pick_pair


def rect(x, y, w, h, label="Car", name="rect", rid=None):
    return {"id": rid or f"{label}{x}{y}", "from_name": name, "to_name": "image", "type": "rectanglelabels",
            "original_width": 100, "original_height": 100,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def test_kept_changed_deleted_added_and_region_scores():
    predicted = [rect(0, 0, 20, 20), rect(50, 50, 20, 20), rect(80, 0, 10, 10), rect(0, 60, 10, 10, label="Dog")]
    annotated = [rect(0, 0, 20, 20),                  # kept exactly
                 rect(50, 50, 20, 25),                # changed (IoU 0.8)
                 rect(20, 80, 10, 10),                # added
                 rect(0, 60, 10, 10, label="Dog")]
    stats = {}
    compare_task(predicted, annotated, stats)
    car = stats[("rect", "Car")]
    assert (car.predicted, car.annotated, car.kept, car.changed, car.deleted, car.added) == (3, 3, 1, 1, 1, 1)
    assert car.matched == 2 and car.precision == 2 / 3 and car.recall == 2 / 3
    assert car.iou == (400 + 400) / (400 + 500 + 100 + 100)
    dog = stats[("rect", "Dog")]
    assert (dog.kept, dog.iou, dog.precision, dog.recall) == (1, 1.0, 1.0, 1.0)


def test_tasks_pair_the_annotation_with_its_source_prediction():
    tasks = [
        {"id": 1, "predictions": [{"id": 5, "model_version": "v1", "result": [rect(0, 0, 50, 50)]},
                                  {"id": 6, "model_version": "v2", "result": [rect(50, 50, 50, 50)]}],
         "annotations": [{"id": 9, "parent_prediction": 5, "result": [rect(0, 0, 50, 50)]}]},
        {"id": 2, "predictions": [], "annotations": [{"id": 10, "result": [rect(0, 0, 5, 5)]}]},
        {"id": 3, "predictions": [{"id": 7, "result": [rect(0, 0, 5, 5)]}],
         "annotations": [{"id": 11, "was_cancelled": True, "result": []}]},
    ]
    assert pick_pair(tasks[0])[0]["id"] == 5
    assert pick_pair(tasks[0], model_version="v2")[0]["id"] == 6
    rows, counts = evaluate_tasks(tasks)
    assert counts == {"tasks": 3, "annotated": 2, "compared": 1, "without_prediction": 1}
    (row,) = rows
    assert (row.label, row.iou, row.kept) == ("Car", 1.0, 1)
    assert "| rect | Car | 1 | 1.000 |" in markdown(rows, counts)
