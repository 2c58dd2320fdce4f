"""The gateway's built-in device transports, found as IDeviceTransport plugins (gateway/transport.py)."""

from gateway.transports.builtin import BrokerPlugin, HttpsPlugin, ModbusPlugin, MqttPlugin, TgpPlugin

https = HttpsPlugin()
tgp = TgpPlugin()
mqtt = MqttPlugin()
mqtt_source = BrokerPlugin()
modbus = ModbusPlugin()
