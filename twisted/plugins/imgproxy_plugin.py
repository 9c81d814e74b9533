from twisted.application.service import ServiceMaker

imgproxy = ServiceMaker(
    "imgproxy", "imgproxy.tap", "A distributed image cache proxy.", "imgproxy"
)
