"""A local, in-memory GCS server for tests: gcp-storage-emulator, plus the x-goog-generation / x-goog-metageneration
headers that real GCS sends with every object download and the emulator leaves out (TensorStore's gcs driver,
which Orbax writes arrays with, reads an object's generation from them and refuses a download without it).

  python tests/gcs_emulator.py PORT        # serves http://127.0.0.1:PORT until killed
"""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # noqa: BLE001 - not found: the handler has answered 404 already
    return
  response['x-goog-generation'] = obj['generation']
  response['x-goog-metageneration'] = obj['metageneration']


objects.download = _download_with_generation   # before the server module binds its routes

if __name__ == '__main__':
  import logging
  import threading

  from gcp_storage_emulator.server import create_server
  logging.disable(logging.CRITICAL)
  server = create_server('127.0.0.1', int(sys.argv[1]), in_memory=True, default_bucket='bucket')
  server.start()
  threading.Event().wait()
