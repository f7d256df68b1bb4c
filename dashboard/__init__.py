"""The Streamlit what-if dashboard (``moeplan dashboard`` or ``streamlit run dashboard/app.py``).

``app.py`` is the entry: the set-up panel (:mod:`.sidebar`) and the page navigation; ``pages/``
holds one script per page. Every number comes from the library through :mod:`.compute` (cached
calls keyed on :mod:`.keys`); :mod:`.charts` draws, :mod:`.views` holds what pages share,
:mod:`.jobs` runs slow solves in the background, :mod:`.uploads` keeps uploaded files and
:mod:`.exports` runs the exporters for the download buttons.
"""
