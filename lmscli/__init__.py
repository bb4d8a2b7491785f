"""lms: the command-line client of lmsd. Imports stay light: `lms ps` never loads llama_cpp or FastAPI."""
