"""Update compression: the job spec's ``compression`` section and the pure tensor codecs.

The worker-side stage and its receiving decode are ``fedbus.transforms.compress``.
"""
