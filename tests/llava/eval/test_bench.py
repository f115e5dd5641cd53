"""The bench's answer tables run end to end on a tiny model and report one row per method (numbers are the
bench's business, not the tests')."""
from PIL import Image

from llava.eval.bench import bench_answers, bench_throughput
from llava.model.builder import build_small_model


def test_answer_tables_have_one_row_per_method_with_positive_numbers():
    tok, model = build_small_model(config_overrides={"vision_config": {"num_hidden_layers": 2}, "n_layers": 1})
    image = Image.new("RGB", (400, 300), (200, 30, 30))
    for table in (bench_answers(model, tok, image, "What colour?", ["pool", "shirg"], 1, gen_length=4, steps=2),
                  bench_throughput(model, tok, image, "What colour?", ["pool", "shirg"], 1, batches=(1, 2),
                                   gen_length=4, steps=2)):
        header, *rows = table.splitlines()
        assert [r.split()[0] for r in rows] == ["pool", "shirg"]
        assert all(float(x.rstrip("x")) > 0 for r in rows for x in r.split()[1:])
