"""The gateway's built-in device transports, found as IDeviceTransport plugins (gateway/transport.py)."""

from gateway.transports.amqp_source import AmqpPlugin
from gateway.transports.builtin import BrokerPlugin, HttpsPlugin, ModbusPlugin, MqttPlugin, TgpPlugin
from gateway.transports.opcua_plugin import OpcuaPlugin
from gateway.transports.tracker_plugins import Gt06Plugin, TeltonikaPlugin

https = HttpsPlugin()
tgp = TgpPlugin()
mqtt = MqttPlugin()
mqtt_source = BrokerPlugin()
amqp_source = AmqpPlugin()
modbus = ModbusPlugin()
opcua = OpcuaPlugin()
teltonika = TeltonikaPlugin()
gt06 = Gt06Plugin()
