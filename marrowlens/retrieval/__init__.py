"""Similar-cell retrieval: FAISS indexes over embedding stores, search by image or cell, a web page."""
