"""Self-contained HTML reports (probe and study): every image embedded, no network needed to read them."""
