"""Pipeline steps, one module each: `python -m components.<step> --help`.

Each is thin: arguments and params in, one library call, outputs written atomically, MLflow logging.
The same commands run under `dvc repro` (dvc.yaml) and under Airflow (dags/).
"""
