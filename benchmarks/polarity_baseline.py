"""TF-IDF (1-2 grams, sublinear tf, min_df 2) + LinearSVC on review_polarity: train cv000-cv799, test cv800-cv999.
Usage: python benchmarks/polarity_baseline.py DIR (where review_polarity.tar.gz was unpacked: DIR/txt_sentoken)."""
import re
import sys
import time
from pathlib import Path
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC
root = Path(sys.argv[1]) / "txt_sentoken"
rows = [(p.read_text(), int(lab == "pos"), int(re.match(r"cv(\d+)", p.name).group(1)))
        for lab in ("neg", "pos") for p in sorted((root / lab).glob("cv*.txt"))]
tr = [(t, y) for t, y, n in rows if n < 800]; te = [(t, y) for t, y, n in rows if n >= 800]
t0 = time.time()
for C in (0.1, 1.0, 10.0):
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    X = vec.fit_transform([t for t, _ in tr]); clf = LinearSVC(C=C).fit(X, [y for _, y in tr])
    acc = (clf.predict(vec.transform([t for t, _ in te])) == [y for _, y in te]).mean()
    print(f"C={C}: train {len(tr)} test {len(te)} accuracy {acc:.4f}")
print(f"{time.time() - t0:.1f} s")
