"""Task builders on hand-made package trees (no network): labels, splits, e-mail parsing."""

import json

from tools import fetch_tasks


def test_spam_and_brown_builders(tmp_path):
    spam_dir = tmp_path / "spam" / "package" / "data"
    for group, i, body in [("spam-1", "1", "Buy now"), ("easy-ham-1", "2", "Meeting at noon")]:
        (spam_dir / group).mkdir(parents=True)
        raw = f"From: a@b.c\nSubject: hello {i}\nContent-Type: text/plain\n\n{body}\n"
        (spam_dir / group / f"{i}.json").write_text(json.dumps({"id": i, "group": group, "text": raw}))
    labels, rows = fetch_tasks.spam(tmp_path / "spam", 0.2)
    assert labels == ["ham", "spam"]
    by_id = {r["id"]: r for r in rows}
    assert by_id["spam/spam-1/1"]["label"] == 1 and by_id["spam/easy-ham-1/2"]["label"] == 0
    assert by_id["spam/spam-1/1"]["text"] == "hello 1. Buy now"

    pkg = tmp_path / "brown" / "package"
    pkg.mkdir(parents=True)
    (pkg / "cats.txt").write_text("ca01 news\ncb01 editorial\n")
    (pkg / "ca01").write_text(" ".join(f"w{i}/nn" for i in range(250)))
    (pkg / "cb01").write_text("The/at cat/nn ./.")
    labels, rows = fetch_tasks.brown_genre(tmp_path / "brown", 0.5, words=100)
    assert labels == ["editorial", "news"]
    news = [r for r in rows if r["id"].startswith("brown/ca01")]
    assert len(news) == 2 and news[0]["text"].split()[:2] == ["w0", "w1"] and news[0]["label"] == 1
    assert len({r["split"] for r in news}) == 1  # one document never straddles train and test
    assert [r["text"] for r in rows if r["id"].startswith("brown/cb01")] == ["The cat ."]
