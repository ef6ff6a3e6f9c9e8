"""The fleet simulator: thousands of FleetLite devices in one process (or a few), each on its
own MQTT connection to a real broker, speaking the real protocol through the ``sdk/`` code.

``python -m fleetlite.tools.sim --broker HOST:PORT --devices 2000 --classes rpi4=0.7,jetson=0.3
--root root.json`` (docs/scaling.md, "Simulator"). Modules, one job each:

- :mod:`.config`  the settings (one dataclass) and the parsers of compact flag values;
- :mod:`.plan`    the seeded fleet plan: ids, classes, install fates, start delays (pure);
- :mod:`.reports` status, Will, birth, telemetry and profile messages (pure, ``sdk`` classes);
- :mod:`.ota`     one install as a sans-I/O state machine: manifest verification, chunk
  requests, frame and hash checks, phases and the final status (pure, ``sdk`` code);
- :mod:`.device`  one device on its own connection: the asyncio adapter;
- :mod:`.runner`  one process's event loop; :mod:`.cli` the flags and ``--processes``;
- :mod:`.stats`   counters and their sum over processes.

**MQTT library: aiomqtt** (the ``sim`` extra). One asyncio event loop serves every connection
of a process: aiomqtt registers each paho client's socket with the loop (``add_reader`` /
``add_writer``) instead of running a network thread per client, so a process holds thousands of
connections on one thread. It was chosen over gmqtt and amqtt's client because it drives
paho-mqtt 2.x, the client the agent itself uses, so a simulated device puts the same MQTT 3.1.1
packets (Will, retained QoS 1 status, clean session) on the wire as a real one; because it ships
type information (``py.typed``) and passes ``mypy --strict`` as the rest of the code must; and
because it is small, maintained and installs as one pure-Python wheel on top of the paho-mqtt
the project already depends on. gmqtt speaks MQTT 5 first and ships no types; amqtt's client
starts several tasks and a plugin manager per connection, which costs more per device. What it
costs: paho parses packets in Python, and aiomqtt runs a 1-second housekeeping task per client
(``loop_misc``) -- the per-device CPU that bounds one process (docs/scaling.md).
"""
