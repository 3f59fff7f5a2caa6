"""The RLHF Workbench app: `streamlit run workbench/app.py`.

Pages are short scripts in pages/; everything they share (store, job manager, loaded models)
lives in workbench/resources.py as process-wide cached resources.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run` puts workbench/ on the path, not the project root
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from workbench import resources  # noqa: E402

# An emoji favicon is drawn by the browser itself (a data: URL); a ":material/...:" favicon would be
# fetched from fonts.gstatic.com, and the app phones nowhere.
st.set_page_config(page_title="RLHF Workbench", page_icon="🧪", layout="wide")

PAGES = ROOT / "pages"
navigation = st.navigation([
    st.Page(PAGES / "home.py", title="Home", icon=":material/home:", default=True),
    st.Page(PAGES / "prompts.py", title="Prompts", icon=":material/edit_note:"),
    st.Page(PAGES / "rank.py", title="Rank", icon=":material/format_list_numbered:"),
    st.Page(PAGES / "labeling.py", title="Labeling", icon=":material/groups:"),
    st.Page(PAGES / "train.py", title="Train", icon=":material/model_training:"),
    st.Page(PAGES / "monitor.py", title="Monitor", icon=":material/monitoring:"),
    st.Page(PAGES / "evaluate.py", title="Evaluate", icon=":material/leaderboard:"),
    st.Page(PAGES / "study.py", title="Study", icon=":material/query_stats:"),
    st.Page(PAGES / "chat.py", title="Chat", icon=":material/chat:"),
])
resources.active_job_banner()
navigation.run()
