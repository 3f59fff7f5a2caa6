"""The Streamlit app over core/: `streamlit run workbench/app.py`."""
